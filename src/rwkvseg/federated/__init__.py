"""Federated training across sites with Flower (Message API): sites files, the Server/Client apps, federate().

Importing this package imports nothing heavy; `federate` and the apps need the `federated` extra (flwr).
"""

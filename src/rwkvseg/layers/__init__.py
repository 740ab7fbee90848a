"""Building blocks shared by the models: RWKV mixers and conv/norm helpers keyed on spatial_dims."""

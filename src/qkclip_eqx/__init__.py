"""qkclip_eqx: QK-Clip and MuonClip for Equinox attention."""

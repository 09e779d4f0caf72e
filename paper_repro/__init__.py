"""Small-scale reproductions of published results, built on qkclip_eqx."""

"""The command line (installed as simsiam_embed.cli): thin click commands over the library."""

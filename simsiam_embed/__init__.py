"""simsiam-embed: learn image embeddings from a folder of unlabelled images with SimSiam."""

__version__ = "0.1.0"

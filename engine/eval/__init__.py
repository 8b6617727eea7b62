"""Evaluation: held-out perplexity over fixed windows and the plain decoding loop the engine is
checked against."""

"""pdbatch: offline batch LLM inference with prefill/decode disaggregation on Dask."""

__version__ = "0.1.0"

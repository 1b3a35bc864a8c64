"""pdbatch's own engine: transformers models, length-bucketed prefill, a continuous-batching
decode loop over a slot KV cache."""

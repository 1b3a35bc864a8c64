"""Input and output: planning and reading the input, prompts and chat templates, shards and the
manifest that make a job resumable."""

"""The KV packet: the contract between any prefill and any decode, and what the transport moves."""

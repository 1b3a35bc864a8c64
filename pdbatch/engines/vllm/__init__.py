"""The vLLM engine: pdbatch's prefill/decode pipeline with vLLM inside every worker.

- engine.py: VLLMEngine, one in-process vLLM per worker, a thread owning its step loop;
- connector.py: the KV connector (vLLM's KVConnectorBase_V1) between vLLM's pages and
  pdbatch's KV packets;
- pages.py: one adapter per attention-backend page layout, verified against vLLM's writer;
- settings.py: pdbatch options -> vLLM settings, and the up-front refusals.

Importing this package does not import vLLM (that takes seconds); building an engine does.
"""

from .settings import check_model, require_vllm, vllm_available


def __getattr__(name):
    if name == "VLLMEngine":
        from .engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(name)


__all__ = ["VLLMEngine", "check_model", "require_vllm", "vllm_available"]

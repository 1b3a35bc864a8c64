from slurm_fixture import slurm_cluster  # noqa: F401  (session-scoped real one-node Slurm)
from fixtures_models import gpt2, gpt2_dir, llama, llama_dir, llama_other_dir  # noqa: F401
import vllm_cache


def pytest_configure(config):
    vllm_cache.start(config)


def pytest_unconfigure(config):
    vllm_cache.stop(config)

from slurm_fixture import slurm_cluster  # noqa: F401  (session-scoped real one-node Slurm)
from fixtures_models import gpt2, gpt2_dir, llama, llama_dir, llama_other_dir  # noqa: F401

# The costliest files first (seconds of a whole-suite run, 2026-12-01, largest first), so that
# the two pytest processes (scripts/test.sh: pytest-xdist, a file at a time, collection order kept
# by --no-loadscope-reorder) do not end with one of them running a long file alone; xdist's own
# order (most tests first) sends files of few but long tests, such as the vLLM pipeline's, last.
# Files not listed keep their order, after these.
COSTLIEST_FIRST = ("test_pipeline.py", "test_reliability.py", "test_vllm_pipeline.py", "test_slurm.py",
                   "test_bench.py", "test_roles.py", "test_model_families.py", "test_monitoring.py",
                   "test_layout.py", "test_vllm_engine.py", "test_hostile_input.py", "test_engine.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file as written

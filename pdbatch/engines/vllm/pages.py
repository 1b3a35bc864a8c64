"""Reading and writing one sequence's KV in vLLM's paged cache: one adapter per page layout.

vLLM hands every attention layer a cache tensor whose *logical* shape is
`[num_blocks, kv_heads, block_size, 2 * head_dim]`, but what its bytes mean is up to the
attention backend's kernels:

- `CPUKTransposedPages` (vLLM's CPU backend, ISAs "vec" and "vec16"): the kernels view each
  (block, head) page as `[2 * block_size, head_dim]` and split it in two halves; the first
  holds K *transposed*, `[head_dim, block_size]`, the second V as `[block_size, head_dim]`.
  Decided in C++ (csrc/cpu), so it is checked against vLLM's own writer (below).
- `LogicalPages` (FLASH_ATTN, TRITON_ATTN on GPU): the kernels read the logical view as it is,
  K = `[..., :head_dim]`, V = `[..., head_dim:]`; the view's strides carry whatever physical
  order vLLM chose (NHD/HND), so indexing it is right for all of them.

Any other backend, ISA or KV-cache dtype is refused (`UnsupportedPageLayout`): a connector
that guessed a layout would hand decode wrong KV and produce wrong text without an error.

`verify` proves an adapter on the live engine before any request runs: it writes random K/V
into two blocks of a real layer's cache with the backend's own cache-update kernel
(`impl.do_kv_cache_update`, what every forward pass uses), reads them back through the
adapter, writes them again through the adapter and compares bytes, then restores the blocks.

Token positions are addressed as vLLM's *slots*: `block_id * block_size + offset`.
"""

from __future__ import annotations

import torch


class UnsupportedPageLayout(RuntimeError):
    """vLLM runs an attention backend whose page layout pdbatch cannot read or write."""


def slots_for(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions [start, end) of a sequence stored in `block_ids`, in order."""
    pos = torch.arange(start, end, dtype=torch.long)
    blocks = torch.tensor(block_ids, dtype=torch.long)
    return blocks[pos // block_size] * block_size + pos % block_size


class PageLayout:
    """One backend's page layout. `cache` is a layer's `[blocks, kv_heads, block_size, 2*D]`
    tensor; `read` returns `[2, kv_heads, n, head_dim]` (K then V) for `slots` (a copy);
    `write` stores such a tensor into `slots`."""

    name = "?"

    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def write(self, cache: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        raise NotImplementedError


class CPUKTransposedPages(PageLayout):
    name = "cpu: per (block, head) K^T [head_dim, block_size] then V [block_size, head_dim]"

    @staticmethod
    def _views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not cache.is_contiguous():
            raise UnsupportedPageLayout("vLLM CPU KV cache is not contiguous: pdbatch cannot read its pages")
        blocks, heads, block_size, two_d = cache.shape
        d = two_d // 2
        pages = cache.view(blocks, heads, 2, block_size * d)
        k_t = pages[:, :, 0].unflatten(-1, (d, block_size))  # [blocks, heads, D, N]
        v = pages[:, :, 1].unflatten(-1, (block_size, d))  # [blocks, heads, N, D]
        return k_t, v, block_size

    def read(self, cache, slots):
        k_t, v, n = self._views(cache)
        b, o = slots // n, slots % n
        # advanced indices split by slices: the token axis comes first -> [tokens, heads, D]
        return torch.stack((k_t[b, :, :, o], v[b, :, o, :])).transpose(1, 2)

    def write(self, cache, slots, kv):
        k_t, v, n = self._views(cache)
        b, o = slots // n, slots % n
        kv = kv.to(device=cache.device, dtype=cache.dtype)
        k_t[b, :, :, o] = kv[0].transpose(0, 1)
        v[b, :, o, :] = kv[1].transpose(0, 1)


class LogicalPages(PageLayout):
    name = "logical [blocks, kv_heads, block_size, 2*head_dim], K first (strides carry NHD/HND)"

    def read(self, cache, slots):
        n = cache.shape[2]
        d = cache.shape[3] // 2
        b, o = (slots // n).to(cache.device), (slots % n).to(cache.device)
        x = cache[b, :, o, :]  # [tokens, heads, 2D]
        return torch.stack((x[..., :d], x[..., d:])).transpose(1, 2)

    def write(self, cache, slots, kv):
        n = cache.shape[2]
        d = cache.shape[3] // 2
        b, o = (slots // n).to(cache.device), (slots % n).to(cache.device)
        kv = kv.to(device=cache.device, dtype=cache.dtype)
        cache[b, :, o, :d] = kv[0].transpose(0, 1)
        cache[b, :, o, d:] = kv[1].transpose(0, 1)


CPU_ISAS = ("vec", "vec16")  # verified here; "amx" (bf16 on AMX CPUs), "neon", ... differ or are unchecked
GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


def layout_for(layer, cache: torch.Tensor, cache_dtype: str = "auto") -> PageLayout:
    """The adapter for one attention layer (vLLM's Attention module bound to `cache`)."""
    backend = layer.attn_backend.get_name()
    if cache_dtype != "auto":
        raise UnsupportedPageLayout(f"KV cache dtype {cache_dtype!r}: pdbatch moves KV in the model's dtype only "
                                    f"(leave vLLM's kv_cache_dtype at 'auto')")
    if cache.dim() != 4 or cache.shape[3] % 2:
        raise UnsupportedPageLayout(f"{backend}: KV cache of shape {tuple(cache.shape)}, expected "
                                    f"[blocks, kv_heads, block_size, 2*head_dim]")
    if backend == "CPU_ATTN":
        isa = getattr(layer, "isa", None)
        if isa not in CPU_ISAS:
            raise UnsupportedPageLayout(
                f"vLLM's CPU attention runs ISA {isa!r} here, whose KV page layout pdbatch does not know "
                f"(known: {', '.join(CPU_ISAS)}); use --engine builtin, or --mode colocated with vLLM")
        return CPUKTransposedPages()
    if backend in GPU_BACKENDS:
        return LogicalPages()
    raise UnsupportedPageLayout(
        f"vLLM attention backend {backend} has a KV page layout pdbatch does not know "
        f"(known: CPU_ATTN, {', '.join(GPU_BACKENDS)}); choose one with VLLM_ATTENTION_BACKEND, "
        f"or run --mode colocated")


@torch.inference_mode()
def verify(layout: PageLayout, layer, cache: torch.Tensor, seed: int = 0) -> None:
    """Check `layout` against the backend's own cache writer on blocks 0 and 1 of `cache`
    (restored afterwards); raise UnsupportedPageLayout on any difference."""
    blocks, heads, block_size, two_d = cache.shape
    if blocks < 2:
        raise UnsupportedPageLayout("vLLM KV cache has fewer than 2 blocks; cannot check its page layout")
    d = two_d // 2
    saved = cache[:2].clone()
    try:
        gen = torch.Generator().manual_seed(seed)
        n = block_size + 3  # crosses a block boundary, leaves both blocks partly empty
        key = torch.randn(n, heads, d, generator=gen).to(device=cache.device, dtype=cache.dtype)
        value = torch.randn(n, heads, d, generator=gen).to(device=cache.device, dtype=cache.dtype)
        slots = slots_for([0, 1], block_size, block_size // 2 - 2, block_size // 2 - 2 + n)
        cache[:2].zero_()
        layer.impl.do_kv_cache_update(layer, key, value, cache, slots.to(cache.device))
        want = torch.stack((key, value)).transpose(1, 2)
        got = layout.read(cache, slots)
        by_vllm = cache[:2].clone()
        cache[:2].zero_()
        layout.write(cache, slots, want)
        same_bytes = torch.equal(cache[:2].view(torch.uint8), by_vllm.view(torch.uint8))
    except UnsupportedPageLayout:
        raise
    except Exception as e:
        raise UnsupportedPageLayout(f"cannot check the KV page layout of {layer.attn_backend.get_name()}: "
                                    f"{type(e).__name__}: {e}") from e
    finally:
        cache[:2].copy_(saved)
    if not torch.equal(got, want) or not same_bytes:
        raise UnsupportedPageLayout(
            f"vLLM's {layer.attn_backend.get_name()} cache writer does not store KV as pdbatch's adapter "
            f"({layout.name}) expects; refusing to move KV (this vLLM version may have changed its layout)")

"""A communication model of Ulysses x ring attention: bytes each rank sends per layer.

A model, not a measurement: it counts the bytes the code sends and divides by a link speed;
it ignores latency, congestion and how well the ring's transfers hide behind its compute.

Per layer, per rank, forward + backward, with ``n = b s / (U R)`` local tokens, element size
``a`` (bf16: 2) and query / key-value widths ``hq d`` / ``hkv' d`` (``hkv'``: K/V heads after
replication up to U):

* Ulysses (U ranks, one all-to-all for Q/K/V and one for the output, and the same two in
  backward): a rank keeps ``1/U`` of what it exchanges, so it sends
  ``2 (U-1)/U n a (2 hq + 2 hkv') d``.
* Ring (R ranks): forward passes the K/V block ``R - 1`` hops, backward passes it again
  ``R - 1`` hops plus the fp32 dK/dV accumulator ``R`` hops. The block a rank holds is its
  ring rank's tokens for its Ulysses head shard: ``2 n hkv' d`` elements, so it sends
  ``(2 (R-1) a + 4 R) 2 n hkv' d``.

A ring step hides its transfer when the step's attention takes longer than sending the
block: one step is ``2 c^2 b`` query-key pairs (``c = s / (2R)``) for ``hq / U`` heads at
``4 d`` FLOPs each (forward), the block is K and V of ``2 c b`` tokens for ``hkv' / U`` heads,
so the transfer hides once ``c >= (hkv' / hq) a F / (2 B)`` for an attention rate ``F``
FLOP/s and a link of ``B`` bytes/s (:func:`ring_hides_transfer_from`).
"""

from __future__ import annotations


def kv_heads_after_ulysses(num_heads: int, num_kv_heads: int, sp: int) -> int:
    """K/V heads the all-to-all carries: replicated up to ``sp`` when fewer (heads.py's rule)."""
    del num_heads
    return num_kv_heads if num_kv_heads % sp == 0 else sp


def sequence_comm_bytes(
    *,
    seq: int,
    micro_batch: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sp: int,
    cp: int,
    elem_bytes: int = 2,
) -> dict[str, float]:
    """Bytes one rank sends per layer (forward + backward): ``all_to_all``, ``ring``, total."""
    n = micro_batch * seq / (sp * cp)
    hkv = kv_heads_after_ulysses(num_heads, num_kv_heads, sp)
    a2a = 2 * (sp - 1) / sp * n * elem_bytes * (2 * num_heads + 2 * hkv) * head_dim
    block = 2 * n * hkv * head_dim  # K and V elements of the block a rank holds
    ring = (2 * (cp - 1) * elem_bytes + 4 * cp) * block if cp > 1 else 0.0
    return {"all_to_all": a2a, "ring": ring, "total": a2a + ring}


def ring_hides_transfer_from(
    num_heads: int,
    num_kv_heads: int,
    sp: int,
    flops_per_s: float,
    link_bytes_per_s: float,
    elem_bytes: int = 2,
) -> float:
    """The chunk length ``c`` (tokens; a ring rank holds ``2c``) from which one ring step's
    attention takes as long as sending its K/V block over the link."""  # fmt: skip
    hkv = kv_heads_after_ulysses(num_heads, num_kv_heads, sp)
    return hkv / num_heads * elem_bytes * flops_per_s / (2 * link_bytes_per_s)

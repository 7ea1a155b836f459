"""Checks that a GPU (or CPU) install trains the right model: ``python -m megatron.validate``.

* :mod:`megatron.validate.rows`: the configurations checked (backends, packed documents,
  every fast path alone and together, sequence parallelism under ``torchrun``);
* :mod:`megatron.validate.gradcheck`: one forward + backward per row against an fp32
  reference, and the kernels that actually ran;
* :mod:`megatron.validate.cli`: the command (table, exit status, ``--only``, ``--self-test``);
* :mod:`megatron.validate.golden` (``--golden``): loss curves of ~100M-parameter models
  trained on a corpus built on the machine, against curves stored in ``tests/golden/``.
"""

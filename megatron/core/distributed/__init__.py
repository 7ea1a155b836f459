"""Data parallelism over the SP x DP group: gradient reduction and ZeRO through FSDP2
(:mod:`.fsdp`)."""

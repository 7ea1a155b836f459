"""Data parallelism over the DP x CP x SP group: gradient reduction and ZeRO through FSDP2
(:mod:`.fsdp`)."""

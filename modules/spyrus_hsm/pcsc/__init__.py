"""PC/SC: the transport of a CCID token (the Rosetta USB) — what pcscd sees (`scard`), why a
token is missing in PC/SC terms (`watch`), and pcscd run inside the module (`daemon`).

Nothing here touches PKCS#11; the HSM layer is told the PC/SC explanation through a callback."""

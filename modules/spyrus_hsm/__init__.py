"""spyrus-hsm: Azure IoT Edge identity secrets kept in a PKCS#11 HSM."""

__version__ = "0.1.0"

"""Azure clients whose credentials stay in the HSM: DPS registration and IoT Hub connections."""

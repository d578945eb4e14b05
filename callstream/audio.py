"""The audio every track carries: 8 kHz, 16-bit signed little-endian, mono PCM."""

SAMPLE_RATE = 8000  # samples per second
BYTES_PER_SAMPLE = 2  # 16-bit signed little-endian
SAMPLES_PER_MS = SAMPLE_RATE // 1000
BYTES_PER_MS = SAMPLES_PER_MS * BYTES_PER_SAMPLE

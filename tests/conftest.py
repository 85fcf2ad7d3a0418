import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

# With 2 cores shared by the test process and in-process servers, OpenMP's busy-waiting threads
# stall small matmuls (measured: 162 s -> 37 s for the SmolLM2 tests). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

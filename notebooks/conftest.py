"""nbval runs each tutorial in a kernel that inherits this process's environment.

nbval reads a cell's IOPub messages only after the cell has finished, and the kernel drops messages past
ZeroMQ's high-water mark; a long cell whose progress widgets refresh often then loses its closing "idle"
message and fails with "Timeout of 5 seconds exceeded waiting for output". Bars refresh every 2 s here.
"""

import os

os.environ.setdefault("TQDM_MININTERVAL", "2")

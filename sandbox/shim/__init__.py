"""containerd runtime shim v2 (`containerd-shim-parma-v2`): one confidential UVM per pod sandbox.

containerd (and through its CRI plugin, Kubernetes) starts the shim with `start`, talks to it over
ttrpc with the Task API, and runs `delete` after it is gone. Modules:

- `ttrpc`: the ttrpc wire protocol (10-byte frame header, request/response messages), server and client;
- `messages`: our own protobuf definitions of the ttrpc, Task API and event messages we use;
- `bundle`: what containerd hands us (the bundle's OCI config.json, annotations, runtime options);
- `sandbox`: the single adapter between the shim and the project's launch code (sandbox/launch);
- `task`: the Task service (state machine of containers and exec processes, stdio into FIFOs);
- `events`: TaskCreate/TaskStart/TaskExit... published back to containerd;
- `main`: the command line (`start`, `delete`, and the daemon itself).

docs/kubernetes.md describes the RuntimeClass, containerd's runtime entry and the annotations.
"""

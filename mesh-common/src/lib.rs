//! Types shared by the kernel programs (`mesh-ebpf`) and user space (`mesh-node`).
#![no_std]

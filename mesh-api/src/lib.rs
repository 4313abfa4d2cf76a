//! The control API: protobuf contract and domain types shared by controller, node and CLI.

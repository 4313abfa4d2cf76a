//! `meshctl`, the operator CLI; it talks to a node's admin API (DESIGN.md §8).

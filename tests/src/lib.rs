//! The netns cluster harness: nodes and pods out of network namespaces and cgroups.

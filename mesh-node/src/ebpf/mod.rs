//! Loading, attaching and pinning the capture programs, and access to their maps.

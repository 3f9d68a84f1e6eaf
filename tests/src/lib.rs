//! Harness for integration tests against a real containerd.

//! Scheduler output to attention inputs (work in progress).

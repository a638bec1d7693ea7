//! The robustness suite's library: recorded histories and their checker.
//! The binary (`metropolis-robustness`) adds the clusters, the clients and
//! the faults.

pub mod checker;
pub mod history;
pub mod selftest;

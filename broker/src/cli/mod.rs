//! The command-line subcommands, each a thin edge over the library with context-rich errors.

pub mod audit;
pub mod bench;
pub mod demo;
pub mod lookup;
pub mod serve;

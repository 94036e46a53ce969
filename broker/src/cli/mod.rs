//! The `carerecord` command-line faces, each a thin edge over the library with context-rich
//! errors. They live in the library (not only the binary) so the development tools
//! (`carerecord-dev demo`) drive the same lookup client and serving path as the product.

pub mod audit;
pub mod conformance;
pub mod lookup;
pub mod serve;
pub mod token;

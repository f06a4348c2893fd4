//! Runnable examples of the NSA layer: the `nsa` binary (the layer forward and backward on a
//! random sequence), `nsa-generate` (a small decoder that prefills a prompt and generates
//! with the layer's cache) and `nsa-recall` (small language models trained on associative
//! recall, with NSA, full or sliding-window attention, evaluated by context length and
//! depth).

pub mod device;
pub mod memory;
pub mod preset;
pub mod recall;

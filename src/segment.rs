//! Segment objects of the cold tier: their byte format lives in [`ferry_codec::segment`] (built
//! without the node by the fuzz targets); this path keeps the node's code unchanged.

pub use ferry_codec::segment::*;

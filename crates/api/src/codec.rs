//! The protobuf codec of every generated client and server
//! (`tonic_prost_build::Builder::codec_path` in build.rs).
//!
//! tonic allocates a codec buffer per call and direction up front and keeps
//! it for the call's life; with its default of 8 KiB, a node's heartbeat
//! stream alone holds 16 KiB of buffers for messages of a few bytes, on
//! every one of thousands of connections. Our messages are small but for
//! streamed GetNodes and logs, where a buffer grows (in steps of its
//! initial size, amortised by `BytesMut`) to the largest message, so a small
//! start costs the big ones little.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a call's encode and decode buffer.
pub const CODEC_BUFFER_SIZE: usize = 256;
/// A streamed response yields to the runtime after this many bytes are
/// encoded in one go (tonic's default).
pub const CODEC_YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`CODEC_BUFFER_SIZE`] buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_SIZE, CODEC_YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

//! Pooled packet buffers, so the steady-state packet path never allocates.
//!
//! Pure. The node takes a buffer from the pool for every packet it emits;
//! the driver hands it back with [`crate::engine::Node::recycle`] once the
//! bytes are on the wire or in the TUN.

use std::fmt;

/// One packet's bytes: a pooled buffer and the length in use.
pub struct PacketBuf {
    data: Vec<u8>,
    len: usize,
}

impl PacketBuf {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Builds a buffer outside any pool (tests, the simulation).
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self { data: bytes.to_vec(), len: bytes.len() }
    }
}

impl fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacketBuf({} bytes)", self.len)
    }
}

/// A free list of equally sized buffers.
pub(crate) struct BufPool {
    free: Vec<Vec<u8>>,
    buf_len: usize,
    /// Buffers beyond this many are freed rather than kept, bounding memory
    /// after a burst.
    max_free: usize,
}

impl BufPool {
    pub(crate) fn new(buf_len: usize, max_free: usize) -> Self {
        Self { free: Vec::new(), buf_len, max_free }
    }

    /// A whole buffer to write into; [`BufPool::finish`] sets its length.
    #[inline]
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_else(|| vec![0; self.buf_len])
    }

    #[inline]
    pub(crate) fn finish(&self, data: Vec<u8>, len: usize) -> PacketBuf {
        debug_assert!(len <= data.len());
        PacketBuf { len: len.min(data.len()), data }
    }

    #[inline]
    pub(crate) fn give_back(&mut self, data: Vec<u8>) {
        if self.free.len() < self.max_free && data.len() == self.buf_len {
            self.free.push(data);
        }
    }

    #[inline]
    pub(crate) fn recycle(&mut self, buf: PacketBuf) {
        self.give_back(buf.data);
    }

    pub(crate) fn buf_len(&self) -> usize {
        self.buf_len
    }
}

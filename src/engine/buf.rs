//! Pooled packet buffers, so the steady-state packet path never allocates.
//!
//! Pure. The node takes a buffer from the pool for every packet it emits;
//! the driver hands it back with [`crate::engine::Node::recycle`] once the
//! bytes are on the wire or in the TUN.

use std::fmt;

/// Bytes kept free in front of every packet bound for the TUN, so the
/// driver can prepend the virtio-net header of an offloading TUN device
/// (10 bytes, or 24 with UDP-tunnel GSO) in place, without a copy.
pub const TUN_HEADROOM: usize = 24;

/// One packet's bytes: a pooled buffer and the range in use.
pub struct PacketBuf {
    data: Vec<u8>,
    start: usize,
    len: usize,
}

impl PacketBuf {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }

    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }

    /// The buffer cut right after the packet, and where the packet starts
    /// in it: bytes before that are free to write a header into. Give the
    /// buffer back with [`crate::engine::Node::recycle_vec`].
    #[inline]
    pub fn into_framed(self) -> (Vec<u8>, usize) {
        let PacketBuf {
            mut data,
            start,
            len,
        } = self;
        data.truncate(start + len);
        (data, start)
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
        Self {
            data: bytes.to_vec(),
            start: 0,
            len: bytes.len(),
        }
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
        Self {
            free: Vec::new(),
            buf_len,
            max_free,
        }
    }

    /// A whole buffer to write into; [`BufPool::finish`] sets its length.
    #[inline]
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_else(|| vec![0; self.buf_len])
    }

    #[inline]
    pub(crate) fn finish(&self, data: Vec<u8>, len: usize) -> PacketBuf {
        self.finish_at(data, 0, len)
    }

    /// A packet written at `start` of the buffer, `len` bytes long.
    #[inline]
    pub(crate) fn finish_at(&self, data: Vec<u8>, start: usize, len: usize) -> PacketBuf {
        debug_assert!(start + len <= data.len());
        let start = start.min(data.len());
        PacketBuf {
            len: len.min(data.len() - start),
            start,
            data,
        }
    }

    /// Keeps a buffer for reuse. One that was cut or grown (a packet handed
    /// out with [`PacketBuf::into_framed`], coalesced with others) is brought
    /// back to the pool's size first.
    #[inline]
    pub(crate) fn give_back(&mut self, mut data: Vec<u8>) {
        if self.free.len() < self.max_free && data.capacity() >= self.buf_len {
            data.resize(self.buf_len, 0);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_packet_keeps_its_headroom_and_its_buffer_returns_to_size() {
        let mut pool = BufPool::new(64, 4);
        let mut data = pool.take();
        data[TUN_HEADROOM..TUN_HEADROOM + 3].copy_from_slice(b"abc");
        let packet = pool.finish_at(data, TUN_HEADROOM, 3);
        assert_eq!(packet.as_slice(), b"abc");
        let (frame, start) = packet.into_framed();
        assert_eq!((frame.len(), start), (TUN_HEADROOM + 3, TUN_HEADROOM));
        // Coalescing may grow a frame past the pool's size; it still comes back.
        let mut grown = frame;
        grown.resize(200, 7);
        pool.give_back(grown);
        let again = pool.take();
        assert_eq!(again.len(), 64, "back to the pool's size");
        // A buffer too small to be one of ours is not kept.
        pool.give_back(vec![0; 8]);
        assert_eq!(pool.take().len(), 64);
    }
}

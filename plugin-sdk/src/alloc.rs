//! The plugin's global allocator (feature `allocator`, on by default), made for the proxy's
//! instance model: every request gets a fresh instance whose memory is thrown away when the
//! request ends, so whatever the allocator does to start up is paid on every request, and
//! memory never has to be given back.
//!
//! - Memory comes first from what the module already has past its data (`__heap_base` up to
//!   the current memory size), then from `memory.grow` in steps of at least 1 MiB: a request
//!   grows its memory once or not at all (each grow is a host call and an `mprotect`). Rust's
//!   default (dlmalloc) grows on its first allocation and in small steps after.
//! - Blocks are powers of two from 16 bytes. A freed block goes on its size's free list and the
//!   next allocation of that size takes it; nothing is split or merged, so every operation is a
//!   few instructions. The last block handed out is returned to the bump pointer when freed and
//!   grows in place when reallocated (a `Vec` or `String` being built).
//!
//! The price is memory: up to twice what is asked for, and a freed block serves only its own
//! size. A plugin that churns through many sizes in one request can disable the feature and
//! bring its own allocator.
//!
//! The logic ([`Heap`]) is plain code over addresses, so native tests drive it over an arena;
//! only [`Allocator`] (Wasm) touches the real memory.
// Allocation is unsafe by nature; this module is the only one that needs it besides generated
// bindings.
#![allow(unsafe_code)]

use core::alloc::Layout;

/// The smallest block, and the alignment every block has without asking.
const MIN_BLOCK: usize = 16;
/// log2 of [`MIN_BLOCK`].
const MIN_CLASS: u32 = MIN_BLOCK.trailing_zeros();
/// Size classes 2^4 ..= 2^(BITS - 1).
const CLASSES: usize = (usize::BITS - MIN_CLASS) as usize;

/// Where new memory comes from: the Wasm linear memory, or a test arena.
pub(crate) trait Memory {
    /// Makes at least `min_bytes` more addressable; returns the new region `(start, end)`, or
    /// `None` when the memory cannot grow that far (the plugin's memory limit).
    fn grow(&mut self, min_bytes: usize) -> Option<(usize, usize)>;
}

/// Free lists per size class plus a bump region.
#[derive(Debug)]
pub(crate) struct Heap {
    /// Next free address of the bump region.
    next: usize,
    /// End of the bump region (exclusive).
    end: usize,
    /// Head of each size class's free list (0: empty); the link is the block's first word.
    free: [usize; CLASSES],
}

/// The size class of a `size`-byte block: log2 of the power of two that holds it, minus
/// [`MIN_CLASS`]; `None` when no block can be that big.
fn class_of(size: usize) -> Option<usize> {
    let size = size.max(MIN_BLOCK);
    let log2 = usize::BITS - (size - 1).leading_zeros();
    (log2 < usize::BITS).then(|| (log2 - MIN_CLASS) as usize)
}

/// The bytes a block of `class` spans.
fn block_size(class: usize) -> usize {
    MIN_BLOCK << class
}

impl Heap {
    /// An empty heap over the region `[start, end)`.
    pub(crate) const fn new(start: usize, end: usize) -> Self {
        Self {
            next: start,
            end,
            free: [0; CLASSES],
        }
    }

    /// A block for `layout`, or null when memory is exhausted.
    ///
    /// # Safety
    /// Every block on a free list must be one this heap handed out and that was freed; `memory`
    /// must only return regions nothing else uses.
    pub(crate) unsafe fn alloc(&mut self, layout: Layout, memory: &mut impl Memory) -> *mut u8 {
        let Some(class) = class_of(layout.size()) else {
            return core::ptr::null_mut();
        };
        // Free blocks are only known to be `MIN_BLOCK`-aligned; a stricter alignment bumps.
        if layout.align() <= MIN_BLOCK {
            let head = self.free[class];
            if head != 0 {
                // SAFETY: `head` is a freed block of this class; its first word is the link.
                self.free[class] = unsafe { (head as *const usize).read() };
                return head as *mut u8;
            }
        }
        self.bump(block_size(class), layout.align().max(MIN_BLOCK), memory)
            .map_or(core::ptr::null_mut(), |addr| addr as *mut u8)
    }

    /// `bytes` from the bump region at `align`, growing the memory when it runs out.
    fn bump(&mut self, bytes: usize, align: usize, memory: &mut impl Memory) -> Option<usize> {
        loop {
            let start = self.next.checked_next_multiple_of(align)?;
            let stop = start.checked_add(bytes)?;
            if stop <= self.end {
                self.next = stop;
                return Some(start);
            }
            self.grow_to(stop, memory)?;
        }
    }

    /// Grows the memory so the bump region reaches `stop` (or moves to a new region that can
    /// hold as much, when the memory did not grow contiguously).
    fn grow_to(&mut self, stop: usize, memory: &mut impl Memory) -> Option<()> {
        let (start, end) = memory.grow(stop - self.end)?;
        if start != self.end {
            self.next = start;
        }
        self.end = end;
        Some(())
    }

    /// Returns a block.
    ///
    /// # Safety
    /// `ptr` was handed out by this heap for `layout` (or reallocated to it) and is not used
    /// after this call.
    pub(crate) unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout.size()) else {
            return;
        };
        let addr = ptr as usize;
        if addr + block_size(class) == self.next {
            self.next = addr;
            return;
        }
        // SAFETY: the block is at least `MIN_BLOCK` bytes and word-aligned, and now unused.
        unsafe { (addr as *mut usize).write(self.free[class]) };
        self.free[class] = addr;
    }

    /// Resizes a block, in place when it still fits or is the last one bumped.
    ///
    /// # Safety
    /// As [`Heap::dealloc`] for `ptr` and `layout`; `new_size` rounded up to `layout.align()`
    /// does not overflow.
    pub(crate) unsafe fn realloc(
        &mut self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        memory: &mut impl Memory,
    ) -> *mut u8 {
        let (Some(old), Some(new)) = (class_of(layout.size()), class_of(new_size)) else {
            return core::ptr::null_mut();
        };
        if new <= old {
            // The block still holds it. When it is freed, its layout says the smaller class:
            // the spare half is lost until the instance ends, which is all it lives.
            return ptr;
        }
        let top = ptr as usize + block_size(old);
        if top == self.next
            && let Some(stop) = (ptr as usize).checked_add(block_size(new))
        {
            // The last block bumped: extend it, growing the memory if need be. A grow that
            // fails, or lands elsewhere (the region moved), leaves the copy below.
            if stop > self.end {
                let _ = self.grow_to(stop, memory);
            }
            if self.next == top && stop <= self.end {
                self.next = stop;
                return ptr;
            }
        }
        // SAFETY: `new_size` with the old alignment is a valid layout (the caller's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as this function's contract.
        let copy = unsafe { self.alloc(new_layout, memory) };
        if !copy.is_null() {
            // SAFETY: both blocks are valid for `layout.size()` bytes and do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, copy, layout.size());
                self.dealloc(ptr, layout);
            }
        }
        copy
    }
}

#[cfg(all(target_family = "wasm", feature = "allocator"))]
pub(crate) use wasm::Allocator;

#[cfg(all(target_family = "wasm", feature = "allocator"))]
mod wasm {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::cell::UnsafeCell;

    use super::{Heap, Memory};

    const PAGE: usize = 65536;
    /// The smallest `memory.grow` the allocator asks for, in bytes.
    const GROW_STEP: usize = 1 << 20;

    unsafe extern "C" {
        /// The first address past the module's data and stack, defined by the linker.
        static __heap_base: u8;
    }

    /// Memory 0, grown with `memory.grow`.
    struct LinearMemory;

    impl Memory for LinearMemory {
        fn grow(&mut self, min_bytes: usize) -> Option<(usize, usize)> {
            let pages = min_bytes.div_ceil(PAGE);
            // A big step first; near the memory limit, just what is needed.
            [pages.max(GROW_STEP / PAGE), pages]
                .into_iter()
                .find_map(|n| {
                    let old = wasm32::memory_grow(0, n);
                    (old != usize::MAX).then(|| (old * PAGE, (old + n) * PAGE))
                })
        }
    }

    /// The global allocator: one [`Heap`] over memory 0.
    #[derive(Debug)]
    pub(crate) struct Allocator(UnsafeCell<Heap>);

    // SAFETY: the Wasm targets the SDK supports have no threads (no `atomics` feature), so the
    // heap is never used by two callers at once.
    #[cfg(not(target_feature = "atomics"))]
    unsafe impl Sync for Allocator {}

    #[cfg(target_feature = "atomics")]
    compile_error!(
        "the SDK's allocator is single-threaded: for a threaded Wasm target, depend on \
         bff-plugin-sdk with `default-features = false` and bring an allocator"
    );

    impl Allocator {
        pub(crate) const fn new() -> Self {
            Self(UnsafeCell::new(Heap::new(0, 0)))
        }

        /// The heap, set up on first use over the memory past the module's data.
        #[allow(clippy::mut_from_ref)]
        fn heap(&self) -> &mut Heap {
            // SAFETY: one caller at a time (see `Sync`), and no caller keeps the reference.
            let heap = unsafe { &mut *self.0.get() };
            if heap.end == 0 {
                let base = &raw const __heap_base as usize;
                *heap = Heap::new(base, wasm32::memory_size(0) * PAGE);
            }
            heap
        }
    }

    // SAFETY: `Heap` hands out disjoint blocks of at least the layout's size and alignment
    // from memory nothing else uses (`memory.grow` regions and the space past the data).
    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the heap's free lists only hold blocks it handed out.
            unsafe { self.heap().alloc(layout, &mut LinearMemory) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `GlobalAlloc::dealloc`'s contract is `Heap::dealloc`'s.
            unsafe { self.heap().dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `GlobalAlloc::realloc`'s contract is `Heap::realloc`'s.
            unsafe {
                self.heap()
                    .realloc(ptr, layout, new_size, &mut LinearMemory)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test memory: an aligned buffer handed out in `step`-byte grows, optionally leaving a
    /// gap before each (memory that something else grew).
    struct Arena {
        buf: Vec<u128>,
        used: usize,
        step: usize,
        gap: usize,
    }

    impl Arena {
        fn new(bytes: usize, step: usize, gap: usize) -> Self {
            Self {
                buf: vec![0; bytes / 16],
                used: 0,
                step,
                gap,
            }
        }

        fn base(&self) -> usize {
            self.buf.as_ptr() as usize
        }

        /// A heap over the first `initial` bytes.
        fn heap(&mut self, initial: usize) -> Heap {
            self.used = initial;
            Heap::new(self.base(), self.base() + initial)
        }
    }

    impl Memory for Arena {
        fn grow(&mut self, min_bytes: usize) -> Option<(usize, usize)> {
            let start = self.used + self.gap;
            let end = start + min_bytes.next_multiple_of(self.step);
            if end > self.buf.len() * 16 {
                return None;
            }
            self.used = end;
            Some((self.base() + start, self.base() + end))
        }
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("valid layout")
    }

    /// Whether the `len` bytes at `addr` all hold `fill`.
    fn filled(addr: usize, len: usize, fill: u8) -> bool {
        // SAFETY (test): `addr` is a live block of at least `len` bytes.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        bytes.iter().all(|&b| b == fill)
    }

    #[test]
    fn size_classes_are_powers_of_two_from_16() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(16), Some(0));
        assert_eq!(class_of(17), Some(1));
        assert_eq!(class_of(4096), Some(8));
        assert_eq!(block_size(8), 4096);
        assert_eq!(class_of(usize::MAX), None);
        assert_eq!(class_of(1 << (usize::BITS - 1)), Some(CLASSES - 1));
    }

    #[test]
    fn a_freed_block_serves_the_next_allocation_of_its_size() {
        let mut mem = Arena::new(1 << 20, 65536, 0);
        let mut heap = mem.heap(4096);
        unsafe {
            let a = heap.alloc(layout(40, 8), &mut mem);
            let b = heap.alloc(layout(64, 8), &mut mem);
            heap.dealloc(a, layout(40, 8));
            assert_eq!(heap.alloc(layout(33, 1), &mut mem), a);
            // The last block bumped goes back to the bump pointer.
            heap.dealloc(b, layout(64, 8));
            assert_eq!(heap.alloc(layout(64, 16), &mut mem), b);
        }
    }

    #[test]
    fn the_last_block_grows_in_place_even_across_a_memory_grow() {
        let mut mem = Arena::new(1 << 20, 65536, 0);
        let mut heap = mem.heap(1024);
        unsafe {
            let a = heap.alloc(layout(100, 1), &mut mem);
            a.write_bytes(7, 100);
            let b = heap.realloc(a, layout(100, 1), 200_000, &mut mem);
            assert_eq!(a, b);
            assert_eq!(*b.add(99), 7);
            // Not the last one any more: moved and copied.
            let _c = heap.alloc(layout(8, 8), &mut mem);
            let d = heap.realloc(b, layout(200_000, 1), 300_000, &mut mem);
            assert_ne!(d, b);
            assert_eq!(*d.add(99), 7);
        }
    }

    #[test]
    fn a_grow_elsewhere_moves_the_bump_region() {
        let mut mem = Arena::new(1 << 20, 65536, 4096);
        let mut heap = mem.heap(256);
        unsafe {
            let a = heap.alloc(layout(200, 8), &mut mem);
            a.write_bytes(3, 200);
            let b = heap.realloc(a, layout(200, 8), 1000, &mut mem);
            assert_ne!(a, b, "the new region is not contiguous");
            assert!(b as usize >= mem.base() + 256 + 4096);
            assert_eq!(*b.add(199), 3);
        }
    }

    #[test]
    fn exhausted_memory_gives_null_and_the_heap_stays_usable() {
        let mut mem = Arena::new(1 << 16, 4096, 0);
        let mut heap = mem.heap(0);
        unsafe {
            assert!(heap.alloc(layout(1 << 17, 8), &mut mem).is_null());
            let a = heap.alloc(layout(1000, 8), &mut mem);
            assert!(!a.is_null());
            assert!(
                heap.realloc(a, layout(1000, 8), 1 << 17, &mut mem)
                    .is_null()
            );
            a.write_bytes(1, 1000);
            assert!(
                heap.alloc(layout(isize::MAX as usize - 64, 8), &mut mem)
                    .is_null()
            );
        }
    }

    /// Random allocations, reallocations and frees of many sizes and alignments: every live
    /// block is aligned, inside the arena, disjoint from the others and keeps its contents.
    #[test]
    fn random_use_keeps_blocks_disjoint_aligned_and_intact() {
        let mut mem = Arena::new(64 << 20, 65536, 0);
        let mut heap = mem.heap(10_000);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let aligns = [1, 2, 8, 16, 32, 64, 4096];
        // (address, layout, fill byte)
        let mut live: Vec<(usize, Layout, u8)> = Vec::new();
        for i in 0..20_000u32 {
            let op = next(10);
            if op < 5 || live.is_empty() {
                let size = match next(20) {
                    0 => 20_000 + next(100_000) as usize,
                    _ => next(600) as usize,
                };
                let l = layout(size, aligns[next(aligns.len() as u64) as usize]);
                let p = unsafe { heap.alloc(l, &mut mem) };
                assert!(!p.is_null(), "op {i}: out of memory");
                let fill = (i % 251) as u8;
                unsafe { p.write_bytes(fill, size) };
                live.push((p as usize, l, fill));
            } else if op < 8 {
                let (p, l, fill) = live.swap_remove(next(live.len() as u64) as usize);
                let new_size = next(3000) as usize;
                let q = unsafe { heap.realloc(p as *mut u8, l, new_size, &mut mem) };
                assert!(!q.is_null(), "op {i}: out of memory");
                let kept = l.size().min(new_size);
                assert!(filled(q as usize, kept, fill), "op {i}: realloc lost data");
                unsafe { q.add(kept).write_bytes(fill, new_size - kept) };
                live.push((q as usize, layout(new_size, l.align()), fill));
            } else {
                let (p, l, fill) = live.swap_remove(next(live.len() as u64) as usize);
                assert!(filled(p, l.size(), fill), "op {i}: block overwritten");
                unsafe { heap.dealloc(p as *mut u8, l) };
            }
        }
        let (lo, hi) = (mem.base(), mem.base() + mem.buf.len() * 16);
        live.sort_by_key(|&(p, ..)| p);
        for w in live.windows(2) {
            assert!(w[0].0 + w[0].1.size() <= w[1].0, "blocks overlap");
        }
        for (p, l, fill) in live {
            assert_eq!(p % l.align(), 0, "misaligned");
            assert!(p >= lo && p + l.size() <= hi, "outside the arena");
            assert!(filled(p, l.size(), fill), "block overwritten");
        }
    }
}

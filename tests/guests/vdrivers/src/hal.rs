//! The crate's `Hal`: identity-mapped DMA memory from a page arena above the image, and the
//! heap (`alloc`) the crate uses for its strings and indirect descriptor tables.
//!
//! Guest RAM below 4 GiB is identity mapped by the shim (2 MiB pages, user-accessible), so
//! physical address = virtual address everywhere, and `share` needs no bounce buffers.
//! The guest is single-threaded (one vCPU, no interrupts taken while Rust code runs), which is
//! what makes the `UnsafeCell`s below sound.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// DMA arena: [16 MiB, 48 MiB) of guest RAM (the image ends below 16 MiB, see guest.ld).
pub const DMA_START: usize = 0x0100_0000;
const DMA_PAGES: usize = 8192;
/// Heap: [48 MiB, 56 MiB).
const HEAP_START: usize = DMA_START + DMA_PAGES * PAGE_SIZE;
const HEAP_SIZE: usize = 8 << 20;
/// RAM the guest needs (the test gives it 64 MiB).
pub const RAM_NEEDED: u64 = (HEAP_START + HEAP_SIZE) as u64;

struct Pages {
    used: UnsafeCell<[u64; DMA_PAGES / 64]>,
}

// SAFETY: single-threaded guest (see the module docs).
unsafe impl Sync for Pages {}

static PAGES: Pages = Pages {
    used: UnsafeCell::new([0; DMA_PAGES / 64]),
};

fn page_used(map: &[u64; DMA_PAGES / 64], page: usize) -> bool {
    map[page / 64] & (1 << (page % 64)) != 0
}

fn set_pages(map: &mut [u64; DMA_PAGES / 64], first: usize, count: usize, used: bool) {
    for page in first..first + count {
        if used {
            map[page / 64] |= 1 << (page % 64);
        } else {
            map[page / 64] &= !(1 << (page % 64));
        }
    }
}

/// DMA pages currently allocated (the reset loops check that drivers give theirs back).
pub fn dma_pages_in_use() -> usize {
    // SAFETY: single-threaded; no other reference to the map is live.
    let map = unsafe { &*PAGES.used.get() };
    map.iter().map(|w| w.count_ones() as usize).sum()
}

/// The HAL the drivers are instantiated with.
pub struct IdentityHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, contiguous RAM that nothing else uses until
// dma_dealloc; addresses are identity mapped, so the physical address is the pointer itself.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: single-threaded; no other reference to the map is live.
        let map = unsafe { &mut *PAGES.used.get() };
        let mut first = 0;
        while pages > 0 && first + pages <= DMA_PAGES {
            match (first..first + pages).find(|&p| page_used(map, p)) {
                Some(busy) => first = busy + 1,
                None => {
                    set_pages(map, first, pages, true);
                    let addr = DMA_START + first * PAGE_SIZE;
                    // SAFETY: the range is inside the arena, RAM below 4 GiB, identity mapped and
                    // now owned by the caller.
                    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE_SIZE) };
                    // The arena does not start at 0, so this is never null.
                    let ptr = NonNull::new(addr as *mut u8).unwrap_or(NonNull::dangling());
                    return (addr as PhysAddr, ptr);
                }
            }
        }
        (0, NonNull::dangling())
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(first) = (paddr as usize)
            .checked_sub(DMA_START)
            .map(|off| off / PAGE_SIZE)
            .filter(|&first| first + pages <= DMA_PAGES)
        else {
            return -1;
        };
        // SAFETY: single-threaded; no other reference to the map is live.
        let map = unsafe { &mut *PAGES.used.get() };
        set_pages(map, first, pages, false);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// A bump heap that takes back the most recent allocation and starts over whenever nothing is
/// allocated (enough for the crate's short-lived strings and indirect tables, and for drivers
/// that are dropped whole between rounds).
pub struct Heap {
    top: UnsafeCell<usize>,
    live: UnsafeCell<usize>,
}

// SAFETY: single-threaded guest (see the module docs).
unsafe impl Sync for Heap {}

impl Heap {
    pub const fn new() -> Heap {
        Heap {
            top: UnsafeCell::new(HEAP_START),
            live: UnsafeCell::new(0),
        }
    }
}

impl Default for Heap {
    fn default() -> Self {
        Heap::new()
    }
}

// SAFETY: every returned block is inside [HEAP_START, HEAP_START + HEAP_SIZE), aligned as asked
// and not handed out again until freed (only the topmost block is ever reused).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; no other reference to `top` is live.
        let top = unsafe { &mut *self.top.get() };
        let start = top.next_multiple_of(layout.align());
        match start.checked_add(layout.size()) {
            Some(end) if end <= HEAP_START + HEAP_SIZE => {
                *top = end;
                // SAFETY: single-threaded; no other reference to `live` is live.
                unsafe { *self.live.get() += 1 };
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: single-threaded; no other reference to `top` is live.
        let top = unsafe { &mut *self.top.get() };
        // SAFETY: as for `top`.
        let live = unsafe { &mut *self.live.get() };
        *live = live.saturating_sub(1);
        if *live == 0 {
            *top = HEAP_START;
        } else if ptr as usize + layout.size() == *top {
            *top = ptr as usize;
        }
    }
}

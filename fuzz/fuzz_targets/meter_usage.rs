//! The usage scanner (`sluice_policy::UsageScanner`): reads token counts from an LLM response
//! body (one JSON document or an SSE stream) as it streams past, in the forwarding path.
//!
//! The first byte picks the vendor (OpenAI or Anthropic) and a chunking; the rest is the body.
//! Checks, beyond "never panics":
//! * the usage found does not depend on how the body is cut: fed whole, byte by byte, and in
//!   chunks drawn from the input, it is the same;
//! * `feed` never allocates (the scanner promises fixed memory: a global allocator here counts
//!   allocations made during `feed`);
//! * `current()` after the last chunk equals `finish()`, and a model name is at most 128 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_policy::{MeterKind, TokenUsage, UsageScanner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn scan(
    kind: MeterKind,
    body: &[u8],
    cuts: &mut dyn Iterator<Item = usize>,
) -> (Option<TokenUsage>, Option<TokenUsage>) {
    let mut s = UsageScanner::new(kind);
    let mut rest = body;
    let before = allocations();
    while !rest.is_empty() {
        let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
        s.feed(&rest[..n]);
        rest = &rest[n..];
    }
    assert_eq!(allocations(), before, "UsageScanner::feed allocated");
    let current = s.current();
    (current, s.finish())
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else { return };
    let kind = if seed & 1 == 0 { MeterKind::OpenAi } else { MeterKind::Anthropic };
    let (current, whole) = scan(kind, body, &mut std::iter::empty());
    assert_eq!(current, whole, "current() after the last byte differs from finish()");
    if let Some(u) = &whole {
        assert!(u.model.as_ref().is_none_or(|m| !m.is_empty() && m.len() <= 128), "{u:?}");
    }
    assert_eq!(scan(kind, body, &mut std::iter::repeat(1)).1, whole, "byte by byte");
    let mut x = u32::from(seed >> 1) | 1;
    let mut cuts = std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        Some((x % 61) as usize + 1)
    });
    assert_eq!(scan(kind, body, &mut cuts).1, whole, "chunked with seed {seed}");
});

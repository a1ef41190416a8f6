#![no_main]

#[global_allocator]
static ALLOC: shoal_fuzz::CappedAlloc = shoal_fuzz::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::aae_record(data));

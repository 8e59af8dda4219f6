//! The protocol message decoder: any bytes, no panic, and what decodes round-trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    relais_core::protocol::fuzzing::decode_message(data);
});

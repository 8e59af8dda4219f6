//! The sans-IO sync state machine: a session of length-prefixed frames from a scoped
//! enumerator and a viewer, no panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    relais_core::protocol::fuzzing::hub_session(data);
});

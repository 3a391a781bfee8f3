//! The object decoder (what storage and peers hand a node): no panic; what decodes keeps the
//! invariants, stays within the limits and round-trips.
#![no_main]

use dynakv_core::limits::MAX_CLOCK_COUNTER;
use dynakv_core::object::Object;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(object) = Object::decode(data) {
        object.check_invariants().unwrap();
        assert!(
            object
                .clock()
                .entries()
                .all(|(_, e)| e.counter <= MAX_CLOCK_COUNTER)
        );
        let again = Object::decode(&object.encode()).unwrap();
        assert_eq!(again, object);
    }
});

//! The backup file and record reader (`dynakv_core::backup`): no panic and no unbounded
//! allocation on any input, and every record it accepts re-encodes to the bytes it read
//! (nothing is accepted that the writer would not have written).
#![no_main]

use dynakv_core::backup::{Reader, encode_end, encode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a restore body (records alone).
    let mut reader = Reader::records(data);
    let mut accepted = Vec::new();
    while let Ok(Some(record)) = reader.next_record() {
        accepted.extend(encode_record(&record.bucket, &record.key, &record.object).unwrap());
    }
    assert!(data.starts_with(&accepted));
    // As a file.
    if let Ok((mut reader, header)) = Reader::file(data) {
        let mut bytes = header.encode();
        let mut count = 0;
        loop {
            match reader.next_record() {
                Ok(Some(record)) => {
                    bytes.extend(
                        encode_record(&record.bucket, &record.key, &record.object).unwrap(),
                    );
                    count += 1;
                }
                Ok(None) => {
                    bytes.extend(encode_end(count));
                    assert_eq!(bytes, data);
                    break;
                }
                Err(_) => break,
            }
        }
    }
});

//! Grow-only set: union.

use super::{
    CrdtError, MAX_ELEMENT_BYTES, MAX_SET_ELEMENTS, MAX_SET_ELEMENTS_MERGED, check_element,
};
use crate::codec::{DecodeError, Reader, Writer};
use std::collections::BTreeSet;

/// A set whose elements, once added, stay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GSet {
    elements: BTreeSet<Vec<u8>>,
}

impl GSet {
    pub fn add(&mut self, element: &[u8]) -> Result<(), CrdtError> {
        check_element(element)?;
        if !self.elements.contains(element) && self.elements.len() >= MAX_SET_ELEMENTS {
            return Err(CrdtError::TooManyElements);
        }
        self.elements.insert(element.to_vec());
        Ok(())
    }

    pub fn elements(&self) -> impl Iterator<Item = &[u8]> {
        self.elements.iter().map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.elements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// The union (up to [`MAX_SET_ELEMENTS_MERGED`]).
    pub fn merge(&mut self, other: &GSet) {
        for element in &other.elements {
            if self.elements.len() >= MAX_SET_ELEMENTS_MERGED {
                break;
            }
            self.elements.insert(element.clone());
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.elements.len() as u64);
        for element in &self.elements {
            w.bytes(element);
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<GSet, DecodeError> {
        let count = r.count(MAX_SET_ELEMENTS_MERGED, "set elements")?;
        let mut elements = BTreeSet::new();
        for _ in 0..count {
            elements.insert(r.bytes(MAX_ELEMENT_BYTES, "set element")?.to_vec());
        }
        Ok(GSet { elements })
    }
}

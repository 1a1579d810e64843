//! The node contract: the small set of values that several Tether programs write and others
//! read, each as one type in one place.
//!
//! | type | written by | read by |
//! |---|---|---|
//! | [`cmdline::BootParams`] (`tether.*` kernel command line) | tether-image, tether-pxe | initramfs, tether-agent |
//! | [`initrd`] (the rootfs as one cpio entry) | tether-pxe, tether-image (qemu tests) | kernel → initramfs |
//! | [`mac::Mac`] | tether-pxe (DHCP), tether-agent (facts) | operator (Machine names, labels) |
//! | [`uuid::Uuid`] | tether-agent (facts) | operator (binding a re-enrolling machine) |
//! | [`token::Token`] | operator, tether-pxe (boot tokens) | tether-agent → machine API |
//! | [`pin::CaPin`] | operator (machine API CA) | tether-pxe, tether-agent (first contact) |
//! | [`manifest::Manifest`] | tether-image (signed) | operator, tether-agent (upgrades) |
//! | [`slot::Slot`] | tether-image (disk layout) | tether-agent (A/B upgrades) |
//! | [`seed::Seed`] (`agent.toml`, NoCloud user-data) | `tether-operator token create` | tether-agent |
//!
//! Everything here is pure: parsing, rendering and checking, with table tests. Values that
//! end up on a kernel command line or in a URL are validated on the way in *and* out, so a
//! hostile value can never be rendered.

/// Serializes a type as its `Display` text and deserializes it through `FromStr`, so every
/// value of the node contract reads and writes the one canonical form, and a malformed one
/// is refused while parsing JSON, YAML or TOML.
#[macro_export]
macro_rules! serde_as_text {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<$ty, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod cmdline;
pub mod error;
pub mod initrd;
pub mod mac;
pub mod manifest;
pub mod pin;
pub mod seed;
pub mod slot;
pub mod token;
pub mod uuid;

pub use cmdline::BootParams;
pub use error::{Error, Result};
pub use mac::Mac;
pub use pin::CaPin;
pub use slot::Slot;
pub use token::Token;
pub use uuid::Uuid;

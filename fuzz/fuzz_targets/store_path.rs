//! Store paths, store directories, nixbase32, hashes, signatures and compression names: every
//! string form that parses prints back to itself (or, for hashes, to a form that parses to the
//! same hash), and encoding arbitrary bytes decodes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_formats::{
    nixbase32, Algo, Compression, Digest, Hash, PublicKey, Signature, StoreDir, StorePath,
};

fuzz_target!(|data: &[u8]| {
    // Bytes → nixbase32 → bytes.
    let enc = nixbase32::encode(data);
    assert_eq!(enc.len(), nixbase32::encoded_len(data.len()));
    assert_eq!(nixbase32::decode(enc.as_bytes()).unwrap(), data);
    assert_eq!(nixbase32::decoded_len(enc.len()), data.len());

    // nixbase32 text → bytes → the same text: decoding accepts canonical encodings only.
    if let Ok(bytes) = nixbase32::decode(data) {
        assert_eq!(
            nixbase32::encode(&bytes).as_bytes(),
            data,
            "non-canonical nixbase32 accepted"
        );
    }
    assert_eq!(
        nixbase32::is_valid(data),
        data.iter().all(|b| nixbase32::ALPHABET.contains(b))
    );

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = StorePath::from_base_name(s) {
        assert_eq!(p.to_string(), s);
        assert_eq!(StorePath::from_base_name(&p.to_string()).unwrap(), p);
        assert!(nixcached_formats::store_path::is_valid_name(p.name()));
        assert_eq!(Digest::parse(p.digest().as_str()).unwrap(), *p.digest());
    }
    if let Ok(d) = Digest::parse(s) {
        assert_eq!(d.as_str(), s);
    }
    if let Ok(dir) = StoreDir::new(s) {
        assert_eq!(StoreDir::new(dir.as_str()).unwrap(), dir);
        assert!(!dir.as_str().ends_with('/') && dir.as_str().starts_with('/'));
    }
    let dir = StoreDir::default();
    if let Ok(p) = dir.parse_path(s) {
        let full = dir.display(&p);
        assert_eq!(dir.parse_path(&full).unwrap(), p);
        assert!(s.starts_with(&full), "{s:?} parsed to {full:?}");
    }
    if let Ok(h) = s.parse::<Hash>() {
        for form in [h.to_nix32(), h.to_sri(), h.to_base16()] {
            assert_eq!(
                form.parse::<Hash>().unwrap(),
                h,
                "{form} does not read back"
            );
        }
        assert_eq!(h.digest().len(), h.algo().digest_len());
        assert_eq!(
            Hash::from_digest_text(h.algo(), &nixbase32::encode(h.digest())).unwrap(),
            h
        );
    }
    for algo in [Algo::Md5, Algo::Sha1, Algo::Sha256, Algo::Sha512] {
        if let Ok(h) = Hash::from_digest_text(algo, s) {
            assert_eq!(h.algo(), algo);
            assert_eq!(h.to_nix32().parse::<Hash>().unwrap(), h);
        }
    }
    if let Ok(sig) = s.parse::<Signature>() {
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
    }
    if let Ok(k) = PublicKey::parse(s) {
        assert_eq!(
            PublicKey::parse(&k.to_string()).unwrap().to_string(),
            k.to_string()
        );
    }
    if let Ok(c) = s.parse::<Compression>() {
        assert_eq!(c.name().parse::<Compression>().unwrap(), c);
    }
});

use super::*;

#[test]
fn batches_stop_at_the_byte_cap_but_always_move_one() {
    let mb = 1 << 20;
    assert_eq!(byte_bounded(&[mb; 20], |s| *s), 8);
    assert_eq!(byte_bounded(&[BATCH_BYTES * 3, 1], |s| *s), 1);
    assert_eq!(byte_bounded(&[1, 2, 3], |s| *s), 3);
    assert_eq!(byte_bounded::<usize>(&[], |s| *s), 0);
}

/// `Objects`' `history` travels between versions: a node that does not
/// know it (its requests lack it) is asked nothing new, and it reads a
/// newer node's request as the ask it knows, ignoring the field.
#[test]
fn objects_history_is_optional_both_ways() {
    #[derive(Debug, Serialize, Deserialize)]
    enum Older {
        Branches { partition: u32 },
        Leaves { partition: u32, branches: Vec<u16> },
        Keys { partition: u32, segments: Vec<u16> },
        Objects { keys: Vec<serde_bytes::ByteBuf> },
    }
    let keys = vec![serde_bytes::ByteBuf::from(b"k".to_vec())];
    let older = shoal_client::frame::encode(&Older::Objects { keys: keys.clone() }).unwrap();
    let read: AaeRequest = shoal_client::frame::decode(&older, 1 << 20).unwrap();
    assert_eq!(
        read,
        AaeRequest::Objects {
            keys: keys.clone(),
            history: false
        }
    );
    let newer = AaeRequest::Objects {
        keys,
        history: true,
    };
    let read: Older =
        shoal_client::frame::decode(&shoal_client::frame::encode(&newer).unwrap(), 1 << 20)
            .unwrap();
    assert!(matches!(read, Older::Objects { keys } if keys.len() == 1));
}

/// A batch holding a batch, a thousand deep (within the decoder's depth
/// limit, in 8 KB), is refused at the first: decoding it whole took
/// over half a MiB of a worker's stack (2 MiB, tokio's), and dropping
/// or printing it as much again.
#[test]
fn a_batch_in_a_batch_is_refused() {
    // MessagePack: (7, {"Batch": [{"Batch": [... "Ping" ...]}]}).
    let level = [&[0x81, 0xa5][..], b"Batch", &[0x91]].concat();
    let mut body = vec![0x92, 0x07];
    for _ in 0..1_000 {
        body.extend_from_slice(&level);
    }
    body.extend_from_slice(&[&[0xa4][..], b"Ping"].concat());
    let crc = crc32fast::hash(&body);
    let decoded = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            shoal_client::frame::decode_body::<(u64, PeerRequest)>(&body, crc)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .unwrap()
        .join()
        .expect("the decoding thread survives");
    let error = decoded.expect_err("a nested batch was accepted");
    assert!(error.contains("Batch"), "{error}");
}

// VIGIL-PATCH: this whole file is Vigil's, not upstream's (see
// VIGIL-PATCH.md at the crate's root).

//! Reading what can still be read of a table file that recovery set aside
//! (see [`crate::Config::set_aside_damaged_tables`]).
//!
//! Such a table's trailer, table of contents, metadata, index or filter block
//! failed to read, so the table cannot be opened the normal way. Its data
//! blocks are usually fine: they lie at the start of the file, one after the
//! other, each with its own header and checksum. This walks them in order
//! without the index, and where a block does not read, looks for the next
//! block header past it.

use super::block::{BlockType, Header, ParsedItem};
use super::{Block, BlockHandle, DataBlock};
use crate::{coding::Decode, file::MAGIC_BYTES, CompressionType, InternalValue};
use std::{fs::File, path::Path};

/// What a salvage read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// Data blocks read whole (their items were handed out).
    pub blocks: u64,
    /// Stretches that did not read (at least one data block each).
    pub unreadable: u64,
    /// Whether the end of the data blocks is known (from the table of
    /// contents) and was reached. `false` when the table of contents itself
    /// did not read: the walk then stops at the first block that is not a
    /// data block, or at the end of the file.
    pub end_known: bool,
}

/// What a salvage finds, in file order.
#[derive(Debug)]
pub enum Found {
    /// An entry of a data block that read whole.
    Item(InternalValue),
    /// A stretch that did not read: the entries in it lie between the item
    /// before and the item after.
    Unreadable,
}

/// Whether `e`, met while opening a table, means the table's bytes are
/// damaged (rather than, say, a file the process may not read).
#[must_use]
pub fn is_damage(e: &crate::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        crate::Error::Io(io) => {
            matches!(io.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData)
        }
        crate::Error::Decompress(_)
        | crate::Error::Unrecoverable
        | crate::Error::ChecksumMismatch { .. }
        | crate::Error::InvalidTag(_)
        | crate::Error::InvalidTrailer
        | crate::Error::InvalidHeader(_)
        | crate::Error::Utf8(_) => true,
        crate::Error::InvalidVersion(_) => false,
    }
}

/// Reads every block past the data blocks that a table's reads depend on
/// (its top-level index, index partitions, filter index and filter blocks),
/// checking each checksum. Recovery reads some of them only when they are
/// pinned, the others on first use: damage there would otherwise surface on
/// a later read (and stop it), not at the open where the table can still be
/// set aside.
///
/// # Errors
///
/// A block that does not read.
pub fn verify(table: &super::Table) -> crate::Result<()> {
    let file = File::open(&*table.path)?;
    let regions = &table.regions;
    let index = table.metadata.index_block_compression;
    walk_region(&file, regions.tli, index)?;
    if let Some(handle) = regions.index {
        walk_region(&file, handle, index)?;
    }
    if let Some(handle) = regions.filter_tli {
        walk_region(&file, handle, index)?;
    }
    if let Some(handle) = regions.filter {
        // Filter blocks are never compressed.
        walk_region(&file, handle, CompressionType::None)?;
    }
    Ok(())
}

/// Reads the blocks lying one after the other in `region`.
fn walk_region(
    file: &File,
    region: BlockHandle,
    compression: CompressionType,
) -> crate::Result<()> {
    let header_len = Header::serialized_len() as u64;
    let start = *region.offset();
    let end = start + u64::from(region.size());
    let mut pos = start;
    while pos < end {
        if pos + header_len > end {
            return Err(crate::Error::InvalidHeader("block header past its region"));
        }
        #[expect(clippy::cast_possible_truncation, reason = "a header is a few bytes")]
        let raw = crate::file::read_exact(file, pos, header_len as usize)?;
        let header = Header::decode_from(&mut &raw[..])?;
        let size = header_len + u64::from(header.data_length);
        if pos + size > end {
            return Err(crate::Error::InvalidHeader("block past its region"));
        }
        let size32 = u32::try_from(size).map_err(|_| crate::Error::InvalidHeader("block size"))?;
        Block::from_file(
            file,
            BlockHandle::new(super::BlockOffset(pos), size32),
            compression,
        )?;
        pos += size;
    }
    Ok(())
}

/// Where the data blocks end and how they are compressed, from the table of
/// contents and the metadata block, when those read.
fn layout(file: &File) -> Option<(u64, Option<CompressionType>)> {
    let mut reader = file;
    let trailer = sfa::Reader::from_reader(&mut reader).ok()?;
    let regions = super::regions::ParsedRegions::parse_from_toc(trailer.toc()).ok()?;
    let end = *regions.tli.offset();
    let compression = super::meta::ParsedMeta::load_with_handle(file, &regions.metadata)
        .ok()
        .map(|m| m.data_block_compression);
    Some((end, compression))
}

/// Reads the block at `pos` (which must end by `end`). `Ok(None)` for a
/// block that is not a data block.
fn block_at(
    file: &File,
    pos: u64,
    end: u64,
    compression: Option<CompressionType>,
) -> crate::Result<Option<(DataBlock, u64)>> {
    let header_len = Header::serialized_len();
    if pos + header_len as u64 > end {
        return Err(crate::Error::InvalidHeader(
            "block header past the data blocks",
        ));
    }
    let raw = crate::file::read_exact(file, pos, header_len)?;
    let header = Header::decode_from(&mut &raw[..])?;
    let size = header_len as u64 + u64::from(header.data_length);
    if pos + size > end {
        return Err(crate::Error::InvalidHeader("block past the data blocks"));
    }
    if header.block_type != BlockType::Data {
        return Ok(None);
    }
    let size32 = u32::try_from(size).map_err(|_| crate::Error::InvalidHeader("block size"))?;
    // Without the metadata block the compression is not known: a block
    // whose stored and uncompressed lengths differ is compressed.
    let compression = compression.unwrap_or(if header.data_length == header.uncompressed_length {
        CompressionType::None
    } else {
        #[cfg(feature = "lz4")]
        {
            CompressionType::Lz4
        }
        #[cfg(not(feature = "lz4"))]
        {
            return Err(crate::Error::Decompress(CompressionType::None));
        }
    });
    let block = Block::from_file(
        file,
        BlockHandle::new(super::BlockOffset(pos), size32),
        compression,
    )?;
    if block.data.len() != header.uncompressed_length as usize {
        return Err(crate::Error::InvalidHeader("uncompressed length"));
    }
    Ok(Some((DataBlock::new(block), pos + size)))
}

/// The position of the next block after `from` that reads (a data block or
/// not), if any.
fn next_block(
    file: &File,
    from: u64,
    end: u64,
    compression: Option<CompressionType>,
) -> crate::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut at = from;
    while at + (MAGIC_BYTES.len() as u64) <= end {
        let len = CHUNK.min(end - at);
        #[expect(clippy::cast_possible_truncation, reason = "at most CHUNK")]
        let chunk = crate::file::read_exact(file, at, len as usize)?;
        for (i, w) in chunk.windows(MAGIC_BYTES.len()).enumerate() {
            if w == MAGIC_BYTES {
                let pos = at + i as u64;
                if block_at(file, pos, end, compression).is_ok() {
                    return Ok(Some(pos));
                }
            }
        }
        // The next chunk overlaps by the magic's length less one.
        at += len.saturating_sub(MAGIC_BYTES.len() as u64 - 1).max(1);
    }
    Ok(None)
}

/// Reads every item of every data block of the table file at `path` that
/// still reads, in file order (keys ascending, a key's versions newest
/// first), handing each to `each`, and each stretch that does not read as
/// [`Found::Unreadable`] in its place (an error from `each` stops the
/// salvage and is returned). Items carry the seqno they were written with
/// (tables set aside have no global seqno).
///
/// # Errors
///
/// The file cannot be opened or read (an I/O error, not damage), or `each`
/// failed.
pub fn salvage(
    path: &Path,
    mut each: impl FnMut(Found) -> crate::Result<()>,
) -> crate::Result<Salvaged> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let (end, compression, end_known) = match layout(&file) {
        Some((end, compression)) if end <= len => (end, compression, true),
        _ => (len, None, false),
    };
    let mut out = Salvaged {
        end_known,
        ..Salvaged::default()
    };
    let mut pos = 0;
    while pos < end {
        match block_at(&file, pos, end, compression) {
            Ok(Some((block, next))) => {
                for item in block.iter() {
                    each(Found::Item(item.materialize(&block.inner.data)))?;
                }
                out.blocks += 1;
                pos = next;
            }
            // Not a data block: the data blocks are over.
            Ok(None) => {
                out.end_known = false;
                break;
            }
            // Damaged, or a read the disk failed (a bad sector): skip ahead.
            Err(_) => {
                out.unreadable += 1;
                each(Found::Unreadable)?;
                match next_block(&file, pos + 1, end, compression)? {
                    Some(next) => pos = next,
                    None => break,
                }
            }
        }
    }
    Ok(out)
}

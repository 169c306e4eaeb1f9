-- Distinct labels of a processed text+label file, kept from the upload's scan so that checking
-- a new job against the file needs no second read of its content (null: not a text+label file,
-- or checked by a version that did not record it).
alter table files add column label_count integer;
